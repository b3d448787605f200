"""Bearer API keys: read from an environment variable or a mounted file, compared in constant time."""

from __future__ import annotations

import hmac
import logging
import os
import time

from .config import AuthArgs

log = logging.getLogger("ray.serve")


def _split(text: str) -> list[str]:
    return [k.strip() for k in text.replace(",", "\n").splitlines() if k.strip() and not k.strip().startswith("#")]


class KeyStore:
    """Accepted keys; a keys file is re-read when it changes (checked at most every ``recheck_s``)."""

    def __init__(self, args: AuthArgs):
        self.args = args
        self.recheck_s = args.reload_s
        self._env_keys = _split(os.environ.get(args.api_keys_env, "")) if args.api_keys_env else []
        self._file_keys: list[str] = []
        self._file_mtime: float | None = None
        self._file_failed = False
        self._checked = 0.0
        self._keys = [k.encode() for k in self._env_keys]
        self._reload_file(force=True)
        state = "on" if self.enabled else "off"
        log.info("auth %s: %d API key(s) configured", state, len(self._keys))

    def _reload_file(self, force: bool = False) -> None:
        path = self.args.api_keys_file
        now = time.monotonic()
        if not path or (not force and now - self._checked < self.recheck_s):
            return
        self._checked = now
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            # fail closed: a configured keys file that cannot be read locks every inference route
            self._file_unreadable(path, log_it=force or not self._file_failed)
            return
        if mtime == self._file_mtime:
            return
        try:
            with open(path, encoding="utf-8") as f:
                self._file_keys = _split(f.read())
        except OSError:
            self._file_unreadable(path, log_it=True)
            return
        self._file_failed = False
        self._file_mtime = mtime
        self._keys = [k.encode() for k in self._env_keys + self._file_keys]

    def _file_unreadable(self, path: str, log_it: bool) -> None:
        if log_it:
            log.error("auth: api_keys_file %s is not readable; its keys are refused until it is", path)
        self._file_failed = True
        self._file_mtime = None
        self._file_keys = []
        self._keys = [k.encode() for k in self._env_keys]

    @property
    def enabled(self) -> bool:
        self._reload_file()
        return bool(self._keys) or self._file_failed

    def check(self, authorization: str | None) -> bool:
        """True if auth is off, or the header carries an accepted key. Every key is compared (no early exit).

        A configured keys file that cannot be read fails closed: no key is accepted until it can.
        """
        if not self.enabled:
            return True
        if self._file_failed and not self._keys:
            return False
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip().encode()
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(given, key)
        return ok
