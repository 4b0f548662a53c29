"""Several ``citadel serve`` processes sharing one keyring while operators change it.

The promise under test: after any sequence of keyring commands on a shared
keyring, no instance fails to decrypt a ciphertext another instance made
with a key that is not retired, and no instance needs a restart to follow.
Waits are bounded polls; assertions are on counts, never on timings.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from support import KEYS, PSEUDONYM_KEY, run, serving, wait_until

from citadel.keyring import load_keyring
from citadel.providers.local import LocalProvider

SENTINEL = {"X-Internal-API-Key": KEYS["sentinel"]}
CONDUCTOR = {"X-Internal-API-Key": KEYS["conductor"]}


@dataclass
class Instance:
    name: str
    url: str
    log: Path

    def encrypt(self, plaintext: str, client: httpx.Client | None = None) -> str:
        r = (client or httpx).post(
            self.url + "/encrypt", json={"plaintext": plaintext}, headers=SENTINEL
        )
        assert r.status_code == 200, r.text
        ct: str = r.json()["encrypted_data"]
        return ct

    def decrypt(self, ct: str, client: httpx.Client | None = None) -> httpx.Response:
        return (client or httpx).post(
            self.url + "/decrypt", json={"encrypted_data": ct}, headers=CONDUCTOR
        )

    def output(self) -> str:
        return self.log.read_text()


@dataclass
class Fleet:
    tmp: Path
    ring: Path
    stack: ExitStack
    instances: dict[str, Instance] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return {
            "CITADEL_API_KEYS": json.dumps({c: [k] for c, k in KEYS.items()}),
            "CITADEL_AUDIT_PSEUDONYM_KEY": PSEUDONYM_KEY,
            "CITADEL_LOCAL_KEYRING": str(self.ring),
            "CITADEL_RATE_LIMIT_PER_CALLER": "10000000/minute",
        }

    def start(self, name: str) -> Instance:
        log = self.tmp / f"{name}.log"
        url, _ = self.stack.enter_context(serving(self.tmp, log=log, **self.env()))
        self.instances[name] = Instance(name, url, log)
        return self.instances[name]

    def keyring(self, *args: str) -> str:
        result = run(["keyring", *args, "--path", str(self.ring)], self.tmp)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def active(self) -> str:
        return load_keyring(self.ring).active


@contextmanager
def fleet(tmp_path: Path, *names: str) -> Iterator[Fleet]:
    with ExitStack() as stack:
        f = Fleet(tmp_path, tmp_path / "shared" / "keyring.json", stack)
        f.ring.parent.mkdir()
        f.keyring("init")
        for name in names:
            f.start(name)
        yield f


def kid(ct: str) -> str:
    return ct.split(":")[1]


def plaintext(response: httpx.Response) -> str | None:
    return response.json().get("plaintext") if response.status_code == 200 else None


def test_after_rotate_a_restarted_instances_ciphertexts_decrypt_on_the_other(
    tmp_path: Path,
) -> None:
    with fleet(tmp_path, "a") as f:
        a = f.instances["a"]
        with ExitStack() as b_life:
            b_url, _ = b_life.enter_context(serving(tmp_path, log=tmp_path / "b.log", **f.env()))
            before = Instance("b", b_url, tmp_path / "b.log").encrypt("made before rotate")
        f.keyring("rotate")
        # An instance that started after the rotate encrypts under the new key at once...
        fresh = LocalProvider(load_keyring(f.ring)).encrypt_sync("made by a fresh instance")
        assert plaintext(a.decrypt(fresh)) == "made by a fresh instance"
        # ...and so does the restarted B, whose ciphertexts A must decrypt too.
        b = f.start("b")
        after = b.encrypt("made after rotate")
        assert kid(after) == f.active() != kid(before)
        assert plaintext(a.decrypt(after)) == "made after rotate"
        assert plaintext(b.decrypt(before)) == "made before rotate"
        assert plaintext(a.decrypt(before)) == "made before rotate"


def test_add_then_activate_reaches_every_instance_without_a_restart(tmp_path: Path) -> None:
    with fleet(tmp_path, "a", "b") as f:
        a, b = f.instances["a"], f.instances["b"]
        old = f.active()
        f.keyring("add")
        (new,) = {k.id for k in load_keyring(f.ring).keys} - {old}
        assert kid(a.encrypt("x")) == kid(b.encrypt("x")) == old  # add does not activate
        f.keyring("activate", new)
        wait_until(lambda: kid(a.encrypt("x")) == new and kid(b.encrypt("x")) == new)
        assert plaintext(b.decrypt(a.encrypt("from a"))) == "from a"
        assert plaintext(a.decrypt(b.encrypt("from b"))) == "from b"


def test_retired_key_is_refused_everywhere_and_restore_brings_it_back(tmp_path: Path) -> None:
    with fleet(tmp_path, "a", "b") as f:
        a, b = f.instances["a"], f.instances["b"]
        old = f.active()
        ct = a.encrypt("under the old key")
        f.keyring("rotate")
        f.keyring("retire", old)

        def code(instance: Instance) -> str | None:
            r = instance.decrypt(ct)
            return None if r.status_code == 200 else r.json()["code"]

        wait_until(lambda: code(a) == "key_retired" and code(b) == "key_retired")
        r = b.decrypt(ct)
        assert r.status_code == 400
        f.keyring("restore", old)
        wait_until(lambda: code(a) is None and code(b) is None)
        assert plaintext(a.decrypt(ct)) == plaintext(b.decrypt(ct)) == "under the old key"


def test_a_broken_keyring_keeps_every_instance_serving_and_is_logged(tmp_path: Path) -> None:
    with fleet(tmp_path, "a", "b") as f:
        a, b = f.instances["a"], f.instances["b"]
        canaries = [e["key"] for e in json.loads(f.ring.read_text())["keys"]]
        good = f.ring.read_bytes()
        f.ring.write_text('{"format": "citadel-keyring/1", "active": "0badc0de", "keys": [')
        wait_until(
            lambda: "keyring_reload_failed" in a.output() and "keyring_reload_failed" in b.output()
        )
        assert plaintext(b.decrypt(a.encrypt("still served"))) == "still served"
        assert plaintext(a.decrypt(b.encrypt("both ways"))) == "both ways"
        f.ring.write_bytes(good)
        f.keyring("rotate")
        new = f.active()
        wait_until(lambda: kid(a.encrypt("x")) == new and kid(b.encrypt("x")) == new)
    for instance in (a, b):
        for canary in canaries:
            assert canary not in instance.output()


@dataclass
class Tally:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    kids: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


def cross_traffic(
    maker: Instance, reader: Instance, tally: Tally, stop: threading.Event, worker: int
) -> None:
    """Encrypt on one instance, decrypt on the other, and older ciphertexts again."""
    made: list[tuple[str, str]] = []
    with httpx.Client(timeout=30) as client:
        for i in range(5000):  # bounded, whatever the machine's speed
            if stop.is_set():
                return
            pt = f"w{worker}-{i}"
            r = client.post(maker.url + "/encrypt", json={"plaintext": pt}, headers=SENTINEL)
            if r.status_code != 200:
                with tally.lock:
                    tally.failures.append(f"encrypt on {maker.name}: {r.status_code} {r.text}")
                continue
            ct = r.json()["encrypted_data"]
            made.append((pt, ct))
            # This one and one made a while ago, likely under an older key.
            for want, old in ((pt, ct), made[i // 2]):
                d = reader.decrypt(old, client)
                with tally.lock:
                    if plaintext(d) == want:
                        tally.ok += 1
                        tally.kids.add(kid(old))
                    else:
                        tally.failures.append(f"decrypt on {reader.name}: {d.status_code} {d.text}")


def test_rotations_under_cross_traffic_never_fail_a_decrypt(tmp_path: Path) -> None:
    with fleet(tmp_path, "a", "b") as f:
        a, b = f.instances["a"], f.instances["b"]
        tally = Tally()
        stop = threading.Event()
        pairs = [(a, b), (b, a), (a, b), (b, a)]
        threads = [
            threading.Thread(target=cross_traffic, args=(m, r, tally, stop, n), daemon=True)
            for n, (m, r) in enumerate(pairs)
        ]
        for t in threads:
            t.start()
        activated = [f.active()]
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline:
                if len(activated) % 2:
                    f.keyring("rotate")
                    activated.append(f.active())
                else:  # the careful order, too: add, let the fleet learn it, activate
                    known = load_keyring(f.ring).ids
                    f.keyring("add")
                    (added,) = load_keyring(f.ring).ids - known
                    f.keyring("activate", added)
                    activated.append(added)
                # Until the load has decrypted under the new key: proof it is in use.
                wait_until(lambda: activated[-1] in tally.kids, timeout=30)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert tally.failures == []
        assert tally.ok > 0
        assert len(activated) >= 3
        assert set(activated) <= tally.kids
        # One more round trip each way, after the load: both instances take up the
        # last key (within the 2 s reload), and each decrypts the other's ciphertext.
        with httpx.Client(timeout=30) as client:
            for maker, reader in ((a, b), (b, a)):
                made: list[str] = []

                def under_last_key(m: Instance = maker, made: list[str] = made) -> bool:
                    r = client.post(m.url + "/encrypt", json={"plaintext": "x"}, headers=SENTINEL)
                    made.append(r.json()["encrypted_data"])
                    return kid(made[-1]) == activated[-1]

                wait_until(under_last_key, timeout=10)
                assert plaintext(reader.decrypt(made[-1], client)) == "x"
        for instance in (a, b):
            metrics = httpx.get(instance.url + "/metrics").text
            assert f'citadel_keyring_decrypts_total{{key_id="{activated[-1]}"}}' in metrics
