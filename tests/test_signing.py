"""citadel.signing: every algorithm and encoding against independent computations.

Known-answer vectors (RFC 4231, RFC 8032) where a standard publishes them;
otherwise the signature is checked with the public key, or (RSA) by raw modular
arithmetic that shares no code with the signer. Every InvalidKey case, and no
canary from a secret in any form of the raised error.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import traceback
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from citadel.errors import InvalidKey, InvalidRequest
from citadel.signing import (
    ALGORITHMS,
    MESSAGE_ENCODINGS,
    SIGNATURE_ENCODINGS,
    decode_message,
    sign,
)

# RFC 4231 test case 2 ("Jefe").
JEFE_MESSAGE = b"what do ya want for nothing?"
JEFE_SHA256 = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
JEFE_SHA384 = (
    "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e"
    "8e2240ca5e69e2c78b3239ecfab21649"
)
JEFE_SHA512 = (
    "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554"
    "9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737"
)
# RFC 8032 section 7.1, tests 1 and 2.
RFC8032_SEED_1 = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
RFC8032_SIG_1 = (
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e3970"
    "1cf9b46bd25bf5f0595bbe24655141438e7a100b"
)
RFC8032_SEED_2 = "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb"
RFC8032_SIG_2 = (
    "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613"
    "d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"
)
RFC8032_PUBLIC_2 = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"
# RFC 6979 appendix A.2.5: ECDSA over P-256 with SHA-256, messages "sample" and "test".
RFC6979_P256_X = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
RFC6979_P256_UX = 0x60FED4BA255A9D31C961EB74C6356D68C049B8923B61FA6CE669622E60F29FB6
RFC6979_P256_UY = 0x7903FE1008B8BC99A41AE9E95628BC64F2F1B20C2D7E9F5177A3C294D4462299
RFC6979_P256_SHA256 = {
    b"sample": (
        0xEFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716,
        0xF7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8,
    ),
    b"test": (
        0xF1ABB023518351CD71D881567B1EA663ED3EFCF6C5132B354F28D3B0B7D38367,
        0x019F4113742A2B14BD25926B49C649155F267E60D3814B4C0CC84250E46F0083,
    ),
}
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
MESSAGE = b"symbol=LTCBTC&side=BUY&type=LIMIT&quantity=1&price=0.1&timestamp=1499827319559"


def pem(key: object, fmt: ser.PrivateFormat = ser.PrivateFormat.PKCS8) -> str:
    return key.private_bytes(ser.Encoding.PEM, fmt, ser.NoEncryption()).decode()  # type: ignore[attr-defined]


def public_pem(key: object) -> str:
    public = key.public_key()  # type: ignore[attr-defined]
    return public.public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo).decode()  # type: ignore[no-any-return]


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def p256_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(RFC8032_SEED_1))


# -- tables -----------------------------------------------------------------------------------------


def test_tables_match_the_contract() -> None:
    assert ALGORITHMS == {
        "hmac-sha256": ("utf-8", "base64", "hex"),
        "hmac-sha384": ("utf-8", "base64", "hex"),
        "hmac-sha512": ("utf-8", "base64", "hex"),
        "ed25519": ("pem", "base64", "hex"),
        "rsa-pkcs1v15-sha256": ("pem",),
        "ecdsa-p256-sha256": ("pem",),
    }
    assert MESSAGE_ENCODINGS == ("utf-8", "base64")
    assert SIGNATURE_ENCODINGS == ("hex", "base64", "base64url")


# -- HMAC -------------------------------------------------------------------------------------------


def test_hmac_sha256_matches_rfc4231_case_2() -> None:
    got = sign("hmac-sha256", "Jefe", JEFE_MESSAGE, key_encoding="utf-8", signature_encoding="hex")
    assert got == JEFE_SHA256


def test_hmac_sha384_matches_rfc4231_case_2() -> None:
    got = sign("hmac-sha384", "Jefe", JEFE_MESSAGE, key_encoding="utf-8", signature_encoding="hex")
    assert got == JEFE_SHA384


def test_hmac_sha512_matches_rfc4231_case_2() -> None:
    got = sign("hmac-sha512", "Jefe", JEFE_MESSAGE, key_encoding="utf-8", signature_encoding="hex")
    assert got == JEFE_SHA512


def test_hmac_base64_key_is_decoded_before_use() -> None:
    secret = base64.b64encode(b"Jefe").decode()
    got = sign("hmac-sha256", secret, JEFE_MESSAGE, key_encoding="base64", signature_encoding="hex")
    assert got == JEFE_SHA256


def test_hmac_hex_key_is_decoded_before_use_in_either_case() -> None:
    for secret in ("4a656665", "4A656665"):
        got = sign(
            "hmac-sha512", secret, JEFE_MESSAGE, key_encoding="hex", signature_encoding="hex"
        )
        assert got == JEFE_SHA512


def test_hmac_signature_encodings_encode_the_same_digest() -> None:
    digest = bytes.fromhex(JEFE_SHA256)
    b64 = sign(
        "hmac-sha256", "Jefe", JEFE_MESSAGE, key_encoding="utf-8", signature_encoding="base64"
    )
    b64url = sign(
        "hmac-sha256", "Jefe", JEFE_MESSAGE, key_encoding="utf-8", signature_encoding="base64url"
    )
    assert b64 == base64.b64encode(digest).decode()
    assert b64url == base64.urlsafe_b64encode(digest).decode().rstrip("=")
    assert "=" not in b64url


def test_hmac_utf8_key_with_non_ascii_characters_is_its_utf8_bytes() -> None:
    secret = "clé-secrète"
    got = sign("hmac-sha256", secret, MESSAGE, key_encoding="utf-8", signature_encoding="hex")
    assert got == hmac.new(secret.encode(), MESSAGE, hashlib.sha256).hexdigest()


def test_hmac_over_binary_message_bytes() -> None:
    message = bytes(range(256))
    got = sign("hmac-sha512", "k", message, key_encoding="utf-8", signature_encoding="hex")
    assert got == hmac.new(b"k", message, hashlib.sha512).hexdigest()


# -- Ed25519 ----------------------------------------------------------------------------------------


def test_ed25519_hex_seed_matches_rfc8032_test_1() -> None:
    got = sign("ed25519", RFC8032_SEED_1, b"", key_encoding="hex", signature_encoding="hex")
    assert got == RFC8032_SIG_1


def test_ed25519_base64_seed_matches_rfc8032_test_2() -> None:
    seed = base64.b64encode(bytes.fromhex(RFC8032_SEED_2)).decode()
    got = sign("ed25519", seed, b"\x72", key_encoding="base64", signature_encoding="hex")
    assert got == RFC8032_SIG_2


@pytest.mark.parametrize("key_encoding", ["base64", "hex"])
def test_ed25519_64_byte_key_seed_then_public_signs_like_its_seed(key_encoding: str) -> None:
    """Coinbase issues Ed25519 keys as 64 bytes: the seed, then its public key."""
    raw = bytes.fromhex(RFC8032_SEED_2 + RFC8032_PUBLIC_2)
    secret = base64.b64encode(raw).decode() if key_encoding == "base64" else raw.hex()
    got = sign("ed25519", secret, b"\x72", key_encoding=key_encoding, signature_encoding="hex")
    assert got == RFC8032_SIG_2


def test_ed25519_64_byte_key_with_another_keys_public_half_is_invalid_key() -> None:
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    public = other.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    secret = base64.b64encode(bytes.fromhex(RFC8032_SEED_2) + public).decode()
    with pytest.raises(InvalidKey) as info:
        sign("ed25519", secret, b"\x72", key_encoding="base64", signature_encoding="hex")
    assert "public key of its first half" in info.value.detail


def test_ed25519_pkcs8_pem_signs_like_its_seed(ed_key: ed25519.Ed25519PrivateKey) -> None:
    got = sign("ed25519", pem(ed_key), b"", key_encoding="pem", signature_encoding="hex")
    assert got == RFC8032_SIG_1


def test_ed25519_base64_signature_verifies_with_the_public_key() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    got = sign("ed25519", pem(key), MESSAGE, key_encoding="pem", signature_encoding="base64")
    key.public_key().verify(base64.b64decode(got), MESSAGE)  # raises if wrong


# -- RSA --------------------------------------------------------------------------------------------


def emsa_pkcs1_v15_sha256(message: bytes, k: int) -> int:
    """RFC 8017 9.2, written out so the check shares no code with the signer."""
    digest_info = (
        bytes.fromhex("3031300d060960864801650304020105000420") + hashlib.sha256(message).digest()
    )
    encoded = b"\x00\x01" + b"\xff" * (k - len(digest_info) - 3) + b"\x00" + digest_info
    return int.from_bytes(encoded, "big")


@pytest.mark.parametrize(
    "fmt", [ser.PrivateFormat.PKCS8, ser.PrivateFormat.TraditionalOpenSSL], ids=["pkcs8", "pkcs1"]
)
def test_rsa_signature_is_pkcs1_v15_sha256(
    rsa_key: rsa.RSAPrivateKey, fmt: ser.PrivateFormat
) -> None:
    secret = pem(rsa_key, fmt)
    assert ("BEGIN RSA PRIVATE KEY" in secret) == (fmt is ser.PrivateFormat.TraditionalOpenSSL)
    got = sign("rsa-pkcs1v15-sha256", secret, MESSAGE, key_encoding="pem", signature_encoding="hex")
    numbers = rsa_key.public_key().public_numbers()
    k = (numbers.n.bit_length() + 7) // 8
    assert len(got) == 2 * k
    assert pow(int(got, 16), numbers.e, numbers.n) == emsa_pkcs1_v15_sha256(MESSAGE, k)


def test_rsa_base64_signature_verifies_with_the_public_key(rsa_key: rsa.RSAPrivateKey) -> None:
    got = sign(
        "rsa-pkcs1v15-sha256",
        pem(rsa_key),
        MESSAGE,
        key_encoding="pem",
        signature_encoding="base64",
    )
    rsa_key.public_key().verify(base64.b64decode(got), MESSAGE, padding.PKCS1v15(), hashes.SHA256())


# -- ECDSA P-256 ------------------------------------------------------------------------------------


def verify_es256(key: ec.EllipticCurvePrivateKey, signature: bytes, message: bytes) -> None:
    assert len(signature) == 64
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    der = encode_dss_signature(r, s)
    key.public_key().verify(der, message, ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize(
    "fmt", [ser.PrivateFormat.PKCS8, ser.PrivateFormat.TraditionalOpenSSL], ids=["pkcs8", "sec1"]
)
def test_ecdsa_signature_is_64_byte_r_s_that_verifies(
    p256_key: ec.EllipticCurvePrivateKey, fmt: ser.PrivateFormat
) -> None:
    secret = pem(p256_key, fmt)
    assert ("BEGIN EC PRIVATE KEY" in secret) == (fmt is ser.PrivateFormat.TraditionalOpenSSL)
    got = sign(
        "ecdsa-p256-sha256", secret, MESSAGE, key_encoding="pem", signature_encoding="base64url"
    )
    verify_es256(p256_key, unb64url(got), MESSAGE)


def test_ecdsa_small_r_or_s_is_left_padded_to_32_bytes(
    p256_key: ec.EllipticCurvePrivateKey,
) -> None:
    # About 1 signature in 128 has an r or s below 2**248, whose DER integer is shorter:
    # the r || s form must still be two fixed 32-byte halves.
    secret = pem(p256_key)
    for i in range(5000):
        message = b"%d" % i
        raw = bytes.fromhex(
            sign("ecdsa-p256-sha256", secret, message, key_encoding="pem", signature_encoding="hex")
        )
        if raw[0] == 0 or raw[32] == 0:
            verify_es256(p256_key, raw, message)
            return
    pytest.fail("no signature with a small r or s in 5000 tries")


def rfc6979_key_pem() -> str:
    key = ec.derive_private_key(RFC6979_P256_X, ec.SECP256R1())
    numbers = key.public_key().public_numbers()
    assert (numbers.x, numbers.y) == (RFC6979_P256_UX, RFC6979_P256_UY)
    return pem(key)


@pytest.mark.parametrize("message", sorted(RFC6979_P256_SHA256))
def test_ecdsa_matches_rfc6979_a25_with_s_in_low_form(message: bytes) -> None:
    """RFC 6979 A.2.5's r, and its s or n - s, whichever is the low one."""
    r, s = RFC6979_P256_SHA256[message]
    got = bytes.fromhex(
        sign(
            "ecdsa-p256-sha256",
            rfc6979_key_pem(),
            message,
            key_encoding="pem",
            signature_encoding="hex",
        )
    )
    assert int.from_bytes(got[:32], "big") == r
    assert int.from_bytes(got[32:], "big") == min(s, P256_ORDER - s)


def test_ecdsa_s_is_always_low(p256_key: ec.EllipticCurvePrivateKey) -> None:
    secret = pem(p256_key)
    for i in range(64):
        raw = bytes.fromhex(
            sign(
                "ecdsa-p256-sha256", secret, b"%d" % i, key_encoding="pem", signature_encoding="hex"
            )
        )
        assert int.from_bytes(raw[32:], "big") <= P256_ORDER // 2
        verify_es256(p256_key, raw, b"%d" % i)


def test_ecdsa_signature_is_the_one_ccxt_computes(p256_key: ec.EllipticCurvePrivateKey) -> None:
    """ccxt's own deterministic ECDSA (its JWT ES256 path) is the oracle."""
    exchange = pytest.importorskip("ccxt.base.exchange").Exchange
    secret = pem(p256_key)
    for i in range(32):
        message = f"header.payload-{i}"
        theirs = exchange.ecdsa(message, secret, "p256", "sha256")
        ours = sign(
            "ecdsa-p256-sha256",
            secret,
            message.encode(),
            key_encoding="pem",
            signature_encoding="hex",
        )
        assert ours == theirs["r"].rjust(64, "0") + theirs["s"].rjust(64, "0")


# -- message decoding -------------------------------------------------------------------------------


def test_decode_message_utf8_is_its_bytes() -> None:
    assert decode_message("prix=€1", "utf-8") == "prix=€1".encode()


def test_decode_message_base64_is_decoded() -> None:
    assert decode_message(base64.b64encode(b"\x00\xffbin").decode(), "base64") == b"\x00\xffbin"


@pytest.mark.parametrize(
    "bad",
    ["not base64!", "QUJD\n", " QUJD", "QUJ", "QUJD====", "QUJ=", "QR==", "QUJ-", "QUJ_", "é"],
    ids=repr,
)
def test_decode_message_refuses_invalid_base64(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        decode_message(bad, "base64")


def test_decode_message_refuses_a_lone_surrogate() -> None:
    with pytest.raises(InvalidRequest):
        decode_message("a\ud800b", "utf-8")


def test_decode_message_refuses_an_unknown_encoding() -> None:
    with pytest.raises(InvalidRequest):
        decode_message("abc", "latin-1")


# -- names outside the tables -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "key_encoding", "signature_encoding"),
    [
        ("hmac-sha1", "utf-8", "hex"),
        ("HMAC-SHA256", "utf-8", "hex"),
        ("hmac-sha256", "pem", "hex"),
        ("ed25519", "utf-8", "hex"),
        ("rsa-pkcs1v15-sha256", "base64", "hex"),
        ("ecdsa-p256-sha256", "hex", "hex"),
        ("hmac-sha256", "utf-8", "base32"),
        ("hmac-sha256", "utf-8", "base64url-padded"),
    ],
)
def test_names_outside_the_tables_are_invalid_request(
    algorithm: str, key_encoding: str, signature_encoding: str
) -> None:
    with pytest.raises(InvalidRequest):
        sign(
            algorithm,
            "secret",
            MESSAGE,
            key_encoding=key_encoding,
            signature_encoding=signature_encoding,
        )


# -- InvalidKey -------------------------------------------------------------------------------------

CANARY = "CANARYSECRET"


def _rsa_pem() -> str:
    return pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


def _encrypted(key_factory: Callable[[], object], fmt: ser.PrivateFormat) -> str:
    key = key_factory()
    return key.private_bytes(  # type: ignore[attr-defined,no-any-return]
        ser.Encoding.PEM, fmt, ser.BestAvailableEncryption(b"passphrase")
    ).decode()


# Each case: (algorithm, key_encoding, secret) that is not a key; every secret holds the
# canary, either literally or (for PEM) as a comment line before the block, which the
# PEM reader skips, so a leak of any of the secret's text would show.
INVALID_KEYS: dict[str, tuple[str, str, str]] = {
    "hmac-empty-utf8": ("hmac-sha256", "utf-8", ""),
    "hmac-empty-base64": ("hmac-sha512", "base64", ""),
    "hmac-empty-hex": ("hmac-sha256", "hex", ""),
    "hmac-bad-base64": ("hmac-sha256", "base64", CANARY + "!!"),
    "hmac-base64-missing-padding": ("hmac-sha256", "base64", CANARY + "Q"),
    "hmac-base64-with-newline": ("hmac-sha256", "base64", CANARY + "\n"),
    "hmac-base64-non-ascii": ("hmac-sha256", "base64", CANARY + "é="),
    "hmac-base64-extra-padding": ("hmac-sha256", "base64", CANARY + "===="),
    "hmac-base64url-alphabet": ("hmac-sha256", "base64", CANARY + "-_-_"),
    "hmac-bad-hex": ("hmac-sha256", "hex", CANARY),
    "hmac-odd-hex": ("hmac-sha512", "hex", "abc"),
    "hmac-hex-with-spaces": ("hmac-sha512", "hex", "ab cd"),
    "hmac-utf8-lone-surrogate": ("hmac-sha256", "utf-8", CANARY + "\udc80"),
    "ed25519-seed-too-short": ("ed25519", "hex", "ab" * 31),
    "ed25519-seed-too-long": ("ed25519", "base64", base64.b64encode(b"\x01" * 48).decode()),
    # 64 bytes whose second half is not the public key of the first (a mismatched pair).
    "ed25519-64-bytes-public-half-mismatch": (
        "ed25519",
        "base64",
        base64.b64encode(b"\x01" * 64).decode(),
    ),
    "ed25519-64-bytes-hex-public-half-mismatch": ("ed25519", "hex", "02" * 64),
    "ed25519-bad-hex": ("ed25519", "hex", CANARY * 6),
    "ed25519-not-pem": ("ed25519", "pem", CANARY),
    "ed25519-rsa-pem": ("ed25519", "pem", CANARY + "\n" + _rsa_pem()),
    "ed25519-ed448-pem": ("ed25519", "pem", pem(ed448.Ed448PrivateKey.generate())),
    "ed25519-public-pem": (
        "ed25519",
        "pem",
        CANARY + "\n" + public_pem(ed25519.Ed25519PrivateKey.generate()),
    ),
    "ed25519-openssh": (
        "ed25519",
        "pem",
        ed25519.Ed25519PrivateKey.generate()
        .private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption())
        .decode(),
    ),
    "ecdsa-rsa-pem": ("ecdsa-p256-sha256", "pem", _rsa_pem()),
    "ecdsa-p384-pem": ("ecdsa-p256-sha256", "pem", pem(ec.generate_private_key(ec.SECP384R1()))),
    "ecdsa-secp256k1-pem": (
        "ecdsa-p256-sha256",
        "pem",
        pem(ec.generate_private_key(ec.SECP256K1()), ser.PrivateFormat.TraditionalOpenSSL),
    ),
    "ecdsa-public-pem": (
        "ecdsa-p256-sha256",
        "pem",
        public_pem(ec.generate_private_key(ec.SECP256R1())),
    ),
    "ecdsa-encrypted-pkcs8": (
        "ecdsa-p256-sha256",
        "pem",
        _encrypted(lambda: ec.generate_private_key(ec.SECP256R1()), ser.PrivateFormat.PKCS8),
    ),
    "rsa-ec-pem": ("rsa-pkcs1v15-sha256", "pem", pem(ec.generate_private_key(ec.SECP256R1()))),
    "rsa-public-pem": (
        "rsa-pkcs1v15-sha256",
        "pem",
        CANARY + "\n" + public_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    ),
    "rsa-encrypted-pkcs1": (
        "rsa-pkcs1v15-sha256",
        "pem",
        _encrypted(
            lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
            ser.PrivateFormat.TraditionalOpenSSL,
        ),
    ),
    "rsa-truncated-pem": ("rsa-pkcs1v15-sha256", "pem", _rsa_pem()[:400] + "\n" + CANARY),
    "rsa-base64-body-without-armour": (
        "rsa-pkcs1v15-sha256",
        "pem",
        "".join(_rsa_pem().splitlines()[1:-1]),
    ),
    "ed25519-encrypted-pkcs8": (
        "ed25519",
        "pem",
        _encrypted(ed25519.Ed25519PrivateKey.generate, ser.PrivateFormat.PKCS8),
    ),
}


def raise_for(case: str) -> InvalidKey:
    algorithm, key_encoding, secret = INVALID_KEYS[case]
    with pytest.raises(InvalidKey) as info:
        sign(algorithm, secret, MESSAGE, key_encoding=key_encoding, signature_encoding="hex")
    return info.value


@pytest.mark.parametrize("case", sorted(INVALID_KEYS))
def test_a_secret_that_is_not_such_a_key_is_invalid_key(case: str) -> None:
    err = raise_for(case)
    assert (err.code, err.status) == ("invalid_key", 400)


@pytest.mark.parametrize("case", sorted(INVALID_KEYS))
def test_invalid_key_error_holds_nothing_of_the_secret(case: str) -> None:
    secret = INVALID_KEYS[case][2]
    err = raise_for(case)
    rendered = "".join(traceback.format_exception(err)) + str(err) + repr(err) + err.detail
    # The canary, and any PEM line of the secret (key material), are absent.
    fragments = [CANARY] + [line for line in secret.splitlines() if len(line) >= 16]
    for fragment in fragments:
        assert fragment not in rendered


@pytest.mark.parametrize("case", sorted(INVALID_KEYS))
def test_invalid_key_error_chains_no_exception(case: str) -> None:
    err = raise_for(case)
    assert err.__cause__ is None
    assert err.__context__ is None


def test_invalid_key_traceback_frames_do_not_hold_the_secret() -> None:
    # A crash reporter that records locals (Sentry, rich) walks the traceback's frames.
    err = raise_for("hmac-bad-base64")
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    (sign_frame,) = [f for f in frames if f.f_globals.get("__name__") == "citadel.signing"]
    assert not any(CANARY in str(value) for value in sign_frame.f_locals.values())


def test_encrypted_pem_says_so() -> None:
    for case in ("rsa-encrypted-pkcs1", "ecdsa-encrypted-pkcs8", "ed25519-encrypted-pkcs8"):
        assert "passphrase" in raise_for(case).detail


def test_public_key_pem_says_a_private_key_is_needed() -> None:
    for case in ("ed25519-public-pem", "ecdsa-public-pem", "rsa-public-pem"):
        assert "public key" in raise_for(case).detail


def test_pem_of_another_type_or_curve_says_so() -> None:
    for case in ("ed25519-rsa-pem", "ecdsa-p384-pem", "ecdsa-secp256k1-pem", "rsa-ec-pem"):
        assert "another type or curve" in raise_for(case).detail


def test_empty_hmac_key_says_it_is_empty() -> None:
    assert "empty" in raise_for("hmac-empty-utf8").detail


def test_a_failed_sign_leaves_the_next_sign_unaffected() -> None:
    raise_for("hmac-bad-hex")
    got = sign("hmac-sha256", "Jefe", JEFE_MESSAGE, key_encoding="utf-8", signature_encoding="hex")
    assert got == JEFE_SHA256


# -- the RSA key check: never inline in prepare(), bounded sizes ---------------------------------


def _wrong_crt(good: rsa.RSAPrivateNumbers) -> rsa.RSAPrivateKey:
    """Real primes, a wrong CRT coefficient: signatures from such a key can reveal its factors."""
    return rsa.RSAPrivateNumbers(
        p=good.p,
        q=good.q,
        d=good.d,
        dmp1=good.dmp1,
        dmq1=good.dmq1,
        iqmp=(good.iqmp + 1) % good.p,
        public_numbers=good.public_numbers,
    ).private_key(unsafe_skip_rsa_key_validation=True)


@pytest.mark.parametrize("algorithm", ["rsa-pkcs1v15-sha256", "ecdsa-p256-sha256", "ed25519"])
def test_prepare_never_runs_the_rsa_key_check(
    monkeypatch: pytest.MonkeyPatch, rsa_key: rsa.RSAPrivateKey, algorithm: str
) -> None:
    import citadel.signing as signing

    skipped: list[bool] = []
    real = signing.load_pem_private_key

    def spy(data: bytes, password: None, *, unsafe_skip_rsa_key_validation: bool) -> object:
        skipped.append(unsafe_skip_rsa_key_validation)
        return real(data, password, unsafe_skip_rsa_key_validation=unsafe_skip_rsa_key_validation)

    monkeypatch.setattr(signing, "load_pem_private_key", spy)
    with contextlib.suppress(InvalidKey):
        signing.prepare(algorithm, pem(rsa_key), key_encoding="pem", signature_encoding="hex")
    assert skipped == [True]


def test_an_rsa_key_not_checked_before_comes_with_its_pem_to_check(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    from citadel.signing import prepare

    secret = pem(rsa_key)
    fresh = prepare("rsa-pkcs1v15-sha256", secret, key_encoding="pem", signature_encoding="hex")
    checked = prepare(
        "rsa-pkcs1v15-sha256",
        secret,
        key_encoding="pem",
        signature_encoding="hex",
        rsa_checked=True,
    )
    assert (fresh.unchecked_pem, checked.unchecked_pem) == (secret.encode(), None)


def test_an_rsa_pem_for_ecdsa_or_ed25519_is_refused_without_a_pem_to_check(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    from citadel.signing import prepare

    for algorithm in ("ecdsa-p256-sha256", "ed25519"):
        with pytest.raises(InvalidKey, match="another type"):
            prepare(algorithm, pem(rsa_key), key_encoding="pem", signature_encoding="hex")


@pytest.mark.parametrize("bits", [1024, 1536, 2560])
def test_an_rsa_key_of_a_size_exchanges_do_not_issue_is_invalid_key(bits: int) -> None:
    from citadel.signing import prepare

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    with pytest.raises(InvalidKey, match="2048, 3072 or 4096 bits"):
        prepare("rsa-pkcs1v15-sha256", pem(key), key_encoding="pem", signature_encoding="hex")


def test_a_malformed_rsa_key_is_refused_by_the_key_check_every_time() -> None:
    good = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_numbers()
    secret = pem(_wrong_crt(good))
    for _ in range(2):
        with pytest.raises(InvalidKey, match="fails the key check"):
            sign(
                "rsa-pkcs1v15-sha256", secret, MESSAGE, key_encoding="pem", signature_encoding="hex"
            )
