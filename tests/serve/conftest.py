"""The serve tests use the session fixtures `ray_cluster` and `service` from tests/conftest.py."""
