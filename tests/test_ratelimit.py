"""Rate limits on one instance and shared through a real redis-server."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import RedisServer, headers, make_settings, serve_citadel, wait_until

from citadel.ratelimit import LocalWindows

BOTH = {"sentinel": ["encrypt", "decrypt"], "conductor": ["encrypt", "decrypt"]}


def enc(c: httpx.Client, caller: str = "sentinel", **hdrs: str) -> httpx.Response:
    return c.post("/encrypt", json={"plaintext": "x"}, headers=headers(caller, **hdrs))


def codes(responses: list[httpx.Response]) -> list[int]:
    return [r.status_code for r in responses]


@pytest.fixture
def limited(tmp_path: Path) -> Any:
    def build(**overrides: Any) -> Any:
        values = {"acl": BOTH, **overrides}
        return serve_citadel(make_settings(tmp_path, **values))

    return build


@pytest.mark.parametrize("storage", ["memory", "redis"])
def test_caller_limit_trips_at_exactly_its_count(
    limited: Any, storage: str, request: pytest.FixtureRequest
) -> None:
    uri = request.getfixturevalue("redis_server").url if storage == "redis" else "memory://"
    with (
        limited(rate_limit_per_caller="3/minute", rate_limit_storage_uri=uri) as s,
        s.client() as c,
    ):
        responses = [enc(c) for _ in range(4)]
        assert codes(responses) == [200, 200, 200, 429]
        # encrypt and decrypt share the caller's budget
        assert (
            c.post(
                "/decrypt", json={"encrypted_data": "x"}, headers=headers("sentinel")
            ).status_code
            == 429
        )
        limited_response = responses[-1]
        assert limited_response.json()["code"] == "rate_limited"
        assert 1 <= int(limited_response.headers["retry-after"]) <= 60
        assert limited_response.headers["x-ratelimit-limit"] == "3"
        assert limited_response.headers["x-ratelimit-remaining"] == "0"
        assert int(limited_response.headers["x-ratelimit-reset"]) > 0
        assert enc(c, "conductor").status_code == 200  # another caller, another budget
        assert 'citadel_rate_limited_total{scope="caller"} 2.0' in c.get("/metrics").text
        assert s.audit.events()[3]["code"] == "rate_limited"
        assert s.audit.events()[3]["requestor"] == "sentinel"


def test_user_limit_spans_callers_and_users_have_separate_budgets(limited: Any) -> None:
    with limited(rate_limit_per_user="2/minute") as s, s.client() as c:
        assert enc(c, "sentinel", X_User_ID="alice").status_code == 200
        assert enc(c, "conductor", X_User_ID="alice").status_code == 200
        assert enc(c, "sentinel", X_User_ID="alice").status_code == 429
        assert enc(c, "sentinel", X_User_ID="bob").status_code == 200
        assert enc(c, "sentinel").status_code == 200  # no user id, no user budget
        assert 'citadel_rate_limited_total{scope="user"} 1.0' in c.get("/metrics").text


def test_auth_failures_are_limited_per_address(limited: Any) -> None:
    with limited(rate_limit_auth_failures="3/minute") as s:
        bad = {"X-Internal-API-Key": "wrong"}
        with s.client() as c:
            results = [c.post("/encrypt", json={"plaintext": "x"}, headers=bad) for _ in range(4)]
            assert codes(results) == [401, 401, 401, 429]
            # a valid key behind the same address is not locked out by a guesser
            assert enc(c).status_code == 200
        other = httpx.HTTPTransport(local_address="127.0.0.2")
        with s.client(transport=other) as c2:
            assert enc(c2).status_code == 200
            assert c2.post("/encrypt", json={"plaintext": "x"}, headers=bad).status_code == 401


def test_windows_reset_after_their_period() -> None:
    from limits import parse

    windows = LocalWindows()
    limit = parse("2/minute")
    clock = [1000.0]
    import citadel.ratelimit as rl

    original = rl.time.monotonic
    rl.time.monotonic = lambda: clock[0]  # type: ignore[assignment]
    try:
        assert [windows.hit(limit, "caller", "a") for _ in range(3)] == [True, True, False]
        clock[0] += 59.9
        assert not windows.hit(limit, "caller", "a")
        clock[0] += 0.2
        assert windows.hit(limit, "caller", "a")
    finally:
        rl.time.monotonic = original  # type: ignore[assignment]


def test_redis_window_resets_after_its_period(limited: Any, redis_server: RedisServer) -> None:
    with (
        limited(rate_limit_per_caller="2/second", rate_limit_storage_uri=redis_server.url) as s,
        s.client() as c,
    ):
        assert codes([enc(c) for _ in range(3)]) == [200, 200, 429]
        wait_until(lambda: enc(c).status_code == 200, timeout=5)


def test_two_instances_on_one_redis_share_one_budget(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    settings = make_settings(
        tmp_path, rate_limit_per_caller="4/minute", rate_limit_storage_uri=redis_server.url
    )
    with (
        serve_citadel(settings) as a,
        serve_citadel(settings) as b,
        a.client() as ca,
        b.client() as cb,
    ):
        results = [enc(ca), enc(cb), enc(ca), enc(cb), enc(ca), enc(cb)]
    assert codes(results) == [200, 200, 200, 200, 429, 429]


def test_redis_killed_and_restarted_never_gives_500(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    settings = make_settings(
        tmp_path, rate_limit_per_caller="1000/minute", rate_limit_storage_uri=redis_server.url
    )
    with serve_citadel(settings) as s, s.client() as c:
        statuses = [enc(c).status_code for _ in range(5)]
        assert c.get("/health").json()["status"] == "healthy"
        redis_server.stop()
        statuses += [enc(c).status_code for _ in range(20)]
        health = c.get("/health").json()
        assert health["status"] == "degraded"
        assert "citadel_rate_limit_storage_degraded 1.0" in c.get("/metrics").text
        redis_server.start()
        wait_until(lambda: c.get("/health").json()["status"] == "healthy", timeout=10)
        statuses += [enc(c).status_code for _ in range(5)]
        assert "citadel_rate_limit_storage_degraded 0.0" in c.get("/metrics").text
    assert set(statuses) == {200}
    logs = [e for e in s.audit.events() if e["code"] != "ok"]
    assert logs == []


def test_limits_survive_redis_down_with_per_instance_counting(tmp_path: Path) -> None:
    dead = RedisServer()  # never started: nothing listens on its port
    settings = make_settings(
        tmp_path, rate_limit_per_caller="2/minute", rate_limit_storage_uri=dead.url
    )
    with serve_citadel(settings) as s, s.client() as c:
        assert codes([enc(c) for _ in range(3)]) == [200, 200, 429]
        assert c.get("/health").json()["status"] == "degraded"


class StallingProxy:
    """A TCP proxy in front of Redis that can hold every byte until released."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.open = threading.Event()
        self.open.set()
        self.held = 0
        self.loop = asyncio.new_event_loop()
        self.port = 0
        started = threading.Event()

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    if not self.open.is_set():
                        self.held += 1
                    while not self.open.is_set():
                        await asyncio.sleep(0.01)
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            r2, w2 = await asyncio.open_connection("127.0.0.1", self.target_port)
            await asyncio.gather(pipe(reader, w2), pipe(r2, writer))

        async def main() -> None:
            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            started.set()
            async with server:
                await server.serve_forever()

        threading.Thread(target=self.loop.run_until_complete, args=(main(),), daemon=True).start()
        started.wait(5)


def test_a_stalled_redis_does_not_stall_health(tmp_path: Path, redis_server: RedisServer) -> None:
    proxy = StallingProxy(redis_server.port)
    uri = f"redis://127.0.0.1:{proxy.port}/0"
    settings = make_settings(tmp_path, rate_limit_storage_uri=uri)
    with serve_citadel(settings) as s, s.client() as c:
        assert enc(c).status_code == 200
        proxy.open.clear()
        result: dict[str, int] = {}
        t = threading.Thread(target=lambda: result.update(status=enc(c).status_code))
        with s.client() as other:
            t.start()
            wait_until(lambda: proxy.held > 0)  # the encrypt's Redis call is being held
            health = other.get("/health", timeout=0.4)  # answered while the encrypt waits on Redis
        assert health.status_code == 200
        t.join(5)
        proxy.open.set()
    assert result["status"] == 200  # the stalled call fell back to local limits


# -- CITADEL_RATE_LIMITS: per-caller overrides ------------------------------------------

MIGRATOR_KEY = "migrator-key-" + "f" * 40
WITH_MIGRATOR = {
    "api_keys": {
        **{
            caller: [headers(caller)["X-Internal-API-Key"]]
            for caller in ("sentinel", "conductor", "api-gateway", "alchemist")
        },
        "migrator": [MIGRATOR_KEY],
    },
    "acl": {**BOTH, "migrator": ["encrypt", "rewrap"]},
}


def enc_migrator(c: httpx.Client, **hdrs: str) -> httpx.Response:
    extra = {k.replace("_", "-"): v for k, v in hdrs.items()}
    return c.post(
        "/encrypt", json={"plaintext": "x"}, headers={"X-Internal-API-Key": MIGRATOR_KEY, **extra}
    )


@pytest.mark.parametrize("storage", ["memory", "redis"])
def test_migration_caller_with_its_own_limit_keeps_going_while_sentinel_is_limited(
    limited: Any, storage: str, request: pytest.FixtureRequest
) -> None:
    uri = request.getfixturevalue("redis_server").url if storage == "redis" else "memory://"
    with (
        limited(
            rate_limit_per_caller="3/minute",
            rate_limits={"migrator": "1000/minute"},
            rate_limit_storage_uri=uri,
            **WITH_MIGRATOR,
        ) as s,
        s.client() as c,
    ):
        sentinel, migrator = [], []
        for _ in range(5):
            sentinel.append(enc(c))
            migrator += [enc_migrator(c) for _ in range(10)]
        metrics = c.get("/metrics").text
    assert codes(sentinel) == [200, 200, 200, 429, 429]
    assert codes(migrator) == [200] * 50
    assert sentinel[3].headers["x-ratelimit-limit"] == "3"
    assert 'citadel_rate_limited_total{scope="caller"} 2.0' in metrics


@pytest.mark.parametrize("storage", ["memory", "redis"])
def test_a_callers_own_limit_is_enforced_at_exactly_its_count(
    limited: Any, storage: str, request: pytest.FixtureRequest
) -> None:
    uri = request.getfixturevalue("redis_server").url if storage == "redis" else "memory://"
    with (
        limited(
            rate_limit_per_caller="1000/minute",
            rate_limits={"migrator": "5/minute"},
            rate_limit_storage_uri=uri,
            **WITH_MIGRATOR,
        ) as s,
        s.client() as c,
    ):
        migrator = [enc_migrator(c) for _ in range(6)]
        sentinel = [enc(c) for _ in range(6)]
    assert codes(migrator) == [200] * 5 + [429]
    assert migrator[-1].headers["x-ratelimit-limit"] == "5"
    assert codes(sentinel) == [200] * 6  # the default applies to everyone else


def test_override_replaces_the_default_also_when_lower(limited: Any) -> None:
    with (
        limited(rate_limit_per_caller="100/minute", rate_limits={"conductor": "1/minute"}) as s,
        s.client() as c,
    ):
        assert codes([enc(c, "conductor") for _ in range(2)]) == [200, 429]
        assert codes([enc(c) for _ in range(3)]) == [200, 200, 200]


def test_override_counts_every_operation_of_the_caller_together(limited: Any) -> None:
    with (
        limited(rate_limits={"migrator": "3/minute"}, **WITH_MIGRATOR) as s,
        s.client() as c,
    ):
        ct = enc_migrator(c).json()["encrypted_data"]
        rewrapped = c.post(
            "/rewrap", json={"encrypted_data": ct}, headers={"X-Internal-API-Key": MIGRATOR_KEY}
        )
        third = enc_migrator(c)
        fourth = c.post(
            "/rewrap", json={"encrypted_data": ct}, headers={"X-Internal-API-Key": MIGRATOR_KEY}
        )
    assert codes([rewrapped, third, fourth]) == [200, 200, 429]


def test_override_leaves_the_per_user_limit_in_force(limited: Any) -> None:
    with (
        limited(
            rate_limit_per_user="2/minute", rate_limits={"migrator": "1000/minute"}, **WITH_MIGRATOR
        ) as s,
        s.client() as c,
    ):
        results = [enc_migrator(c, X_User_ID="alice") for _ in range(3)]
        no_user = enc_migrator(c)
    assert codes(results) == [200, 200, 429]
    assert results[-1].json()["code"] == "rate_limited"
    assert no_user.status_code == 200


def test_two_instances_on_one_redis_share_a_callers_own_budget(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    settings = make_settings(
        tmp_path,
        rate_limit_per_caller="1/minute",
        rate_limits={"migrator": "4/minute"},
        rate_limit_storage_uri=redis_server.url,
        **WITH_MIGRATOR,
    )
    with (
        serve_citadel(settings) as a,
        serve_citadel(settings) as b,
        a.client() as ca,
        b.client() as cb,
    ):
        results = [enc_migrator(client) for _ in range(3) for client in (ca, cb)]
    assert codes(results) == [200, 200, 200, 200, 429, 429]


def test_citadel_rate_limits_from_the_environment_of_a_real_process(tmp_path: Path) -> None:
    import json

    from support import serving

    env = {
        "CITADEL_API_KEYS": json.dumps(WITH_MIGRATOR["api_keys"]),
        "CITADEL_ACL": json.dumps({"sentinel": ["encrypt"], "migrator": ["encrypt"]}),
        "CITADEL_RATE_LIMIT_PER_CALLER": "2/minute",
        "CITADEL_RATE_LIMITS": json.dumps({"migrator": "50/minute"}),
    }
    with serving(tmp_path, **env) as (url, _proc), httpx.Client(base_url=url) as c:
        sentinel = [enc(c) for _ in range(3)]
        migrator = [enc_migrator(c) for _ in range(10)]
    assert codes(sentinel) == [200, 200, 429]
    assert codes(migrator) == [200] * 10


@pytest.mark.parametrize(
    "value",
    ['{"migrator": "lots-SECRETISH/minute"}', '["migrator"]', '{"": "5/minute"}', "not json"],
)
def test_bad_citadel_rate_limits_stops_start_up_naming_the_setting(
    tmp_path: Path, value: str
) -> None:
    from support import free_port, run

    result = run(["serve", "--port", str(free_port())], tmp_path, CITADEL_RATE_LIMITS=value)
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "CITADEL_RATE_LIMITS" in output
    assert "SECRETISH" not in output
    assert "Traceback" not in output
