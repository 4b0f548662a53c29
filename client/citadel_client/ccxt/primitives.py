"""ccxt's signing primitives replaced on one instance (never on a ccxt class)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Final

from citadel_client.ccxt.errors import NotCovered
from citadel_client.ccxt.keys import _HMAC_ALGORITHMS, _JWT_HMAC, _Call
from citadel_client.ccxt.signer import _Signer, _text

# -- the primitives, per instance ------------------------------------------------------------------

# ccxt's encoders of key material: a secret encoded by one is a secret sent as it is.
_ENCODERS: Final = (
    "string_to_base64",
    "binary_to_base64",
    "urlencode_base64",
    "binary_to_base16",
)


def _install(ex: Any, signer: _Signer) -> None:
    """Replace ccxt's signing primitives on ``ex`` alone; its class and other objects keep them."""
    orig = signer.originals

    def hmac_(
        request: Any, secret: Any, algorithm: Any = hashlib.sha256, digest: str = "hex"
    ) -> Any:
        key = signer.key_for(secret)
        if key is None:
            signer.refuse_tainted("sign a message holding", request)
            return orig["hmac"](request, secret, algorithm, digest)
        name = _HMAC_ALGORITHMS.get(algorithm)
        if name is None:
            raise NotCovered(f"{ex.id} signs with an HMAC hash that /sign does not offer.")
        if key.form.endswith("-pem"):
            raise NotCovered(f"{ex.id} uses a PEM key as an HMAC secret.")
        encoding = {"hex": "hex", "base64": "base64"}.get(digest, "hex")
        call = _Call(
            key,
            name,
            bytes(request),
            key.key_encoding,
            encoding,
            digest if digest in ("hex", "base64") else "binary",
        )
        return signer.signature(call)

    def rsa_(request: Any, secret: Any, alg: str = "sha256", padding_mode: str = "pkcs1") -> Any:
        key = signer.key_for(secret)
        if key is None:
            return orig["rsa"](request, secret, alg, padding_mode)
        if key.form != "rsa-pem" or alg != "sha256" or padding_mode != "pkcs1":
            raise NotCovered(f"{ex.id} signs with an RSA scheme other than PKCS#1 v1.5 SHA-256.")
        msg = request.encode("utf-8") if isinstance(request, str) else bytes(request)
        return signer.signature(_Call(key, "rsa-pkcs1v15-sha256", msg, "pem", "base64", "base64"))

    def eddsa_(request: Any, secret: Any, curve: str = "ed25519", url_encode: bool = False) -> Any:
        key = signer.key_for(secret)
        if key is None:
            return orig["eddsa"](request, secret, curve, url_encode)
        if curve != "ed25519" or key.form not in (
            "ed25519-pem",
            "ed25519-base64",
            "ed25519-hex",
        ):
            raise NotCovered(f"{ex.id} signs with an EdDSA key /sign cannot read.")
        encoding = {
            "ed25519-pem": "pem",
            "ed25519-base64": "base64",
            "ed25519-hex": "hex",
        }[key.form]
        out = "base64url" if url_encode else "base64"
        msg = request.encode("utf-8") if isinstance(request, str) else bytes(request)
        return signer.signature(_Call(key, "ed25519", msg, encoding, out, out))

    def ecdsa_(
        request: Any,
        secret: Any,
        algorithm: str = "p256",
        hash: Any = None,
        fixed_length: bool = False,
    ) -> Any:
        key = signer.key_for(secret)
        if key is None:
            return orig["ecdsa"](request, secret, algorithm, hash, fixed_length)
        # ccxt's ecdsa returns a recovery id too, which needs the public key; and
        # secp256k1 over a caller's digest would make Citadel a blind signer.
        raise NotCovered(
            f"{ex.id} signs with ECDSA ({algorithm}) outside a JWT, which /sign does not cover."
        )

    def hash_(request: Any, algorithm: str = "md5", digest: str = "hex") -> Any:
        signer.refuse_tainted("hash a value holding", request)
        return orig["hash"](request, algorithm, digest)

    def jwt_(
        request: Any,
        secret: Any,
        algorithm: str = "sha256",
        is_rsa: bool = False,
        opts: Any = None,
    ) -> Any:
        opts = opts or {}
        key = signer.key_for(secret)
        if key is None:
            return orig["jwt"](request, secret, algorithm, is_rsa, opts)
        alg = ("RS" if is_rsa else "HS") + algorithm[3:]
        if opts.get("alg") is not None:
            alg = opts["alg"]
        header_opts = {"alg": alg, "typ": "JWT"}
        if opts.get("kid") is not None:
            header_opts["kid"] = opts["kid"]
        if opts.get("nonce") is not None:
            header_opts["nonce"] = opts["nonce"]
        header = ex.urlencode_base64(ex.encode(ex.json(header_opts)))
        data = ex.urlencode_base64(ex.encode(ex.json(request)))
        token = header + "." + data
        kind = alg[0:2]
        msg = token.encode("utf-8")
        if is_rsa or kind == "RS":
            if key.form != "rsa-pem" or algorithm != "sha256":
                raise NotCovered(f"{ex.id} signs a JWT with an RSA scheme /sign does not offer.")
            call = _Call(key, "rsa-pkcs1v15-sha256", msg, "pem", "base64url", "base64url")
        elif kind == "ES":
            if key.form != "ec-pem" or algorithm != "sha256":
                raise NotCovered(f"{ex.id} signs a JWT with an ECDSA scheme /sign does not offer.")
            call = _Call(key, "ecdsa-p256-sha256", msg, "pem", "base64url", "base64url")
        elif kind == "Ed":
            encoding = {
                "ed25519-pem": "pem",
                "ed25519-base64": "base64",
                "ed25519-hex": "hex",
            }.get(key.form)
            if encoding is None:
                raise NotCovered(f"{ex.id} signs an EdDSA JWT with a key /sign cannot read.")
            call = _Call(key, "ed25519", msg, encoding, "base64url", "base64url")
        else:
            name = _JWT_HMAC.get(algorithm)
            if name is None or key.form.endswith("-pem"):
                raise NotCovered(f"{ex.id} signs a JWT with an HMAC scheme /sign does not offer.")
            call = _Call(key, name, msg, key.key_encoding, "base64url", "base64url")
        return token + "." + _text(signer.signature(call))

    def encoder(name: str) -> Callable[..., Any]:
        original = orig[name]

        def encode_(value: Any, *args: Any) -> Any:
            signer.refuse_tainted("encode (to send) a value holding", value)
            return original(value, *args)

        return encode_

    for name in _ENCODERS:
        setattr(ex, name, encoder(name))
    for name, fn in (
        ("hmac", hmac_),
        ("rsa", rsa_),
        ("eddsa", eddsa_),
        ("ecdsa", ecdsa_),
        ("hash", hash_),
        ("jwt", jwt_),
    ):
        setattr(ex, name, fn)
