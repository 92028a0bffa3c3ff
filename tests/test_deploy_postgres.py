"""The deployments' database URL form against a real PostgreSQL: the URL carries no password
(compose: ASM_CONTROLLER_STATE=postgresql://asm@postgres:5432/asm; the k8s overlay likewise), the
driver takes it from PGPASSWORD (the user's db.env / the Secret's `password` key)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from asm_controller._store import StoreError, open_store
from tests.support.pg_server import PASSWORD, SUPERUSER, PostgresServer

ROOT = Path(__file__).resolve().parent.parent


def _compose_state_url() -> str:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    url: str = services["controller1"]["environment"]["ASM_CONTROLLER_STATE"]
    return url


async def test_state_url_without_password_connects_with_pgpassword(pg: PostgresServer,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    database = pg.create_database().rsplit("/", 1)[1]
    # The compose URL, pointed at this cluster (its user, host, port and database).
    url = re.sub(r"^postgresql://asm@postgres:5432/asm$",
                 f"postgresql://{SUPERUSER}@127.0.0.1:{pg.port}/{database}", _compose_state_url())
    assert ":" not in url.split("//", 1)[1].split("@", 1)[0], "the URL must carry no password"
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", "/nonexistent")  # no ~/.pgpass of this machine
    with pytest.raises(StoreError):  # without PGPASSWORD the server refuses (scram over TCP)
        await open_store(url).open()
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    store = open_store(url)
    await store.open()
    await store.close()
