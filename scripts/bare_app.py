"""The benchmark's baseline: bare FastAPI endpoints that only validate the same JSON bodies."""

from fastapi import FastAPI
from starlette.responses import Response

from citadel.http.bodies import DecryptRequest, EncryptRequest, RewrapRequest, SignRequest

app = FastAPI()


@app.post("/encrypt")
async def encrypt(body: EncryptRequest) -> Response:
    return Response(b'{"encrypted_data":"x"}', media_type="application/json")


@app.post("/decrypt")
async def decrypt(body: DecryptRequest) -> Response:
    return Response(b'{"plaintext":"x"}', media_type="application/json")


@app.post("/sign")
async def sign(body: SignRequest) -> Response:
    return Response(b'{"signature":"x"}', media_type="application/json")


@app.post("/rewrap")
async def rewrap(body: RewrapRequest) -> Response:
    return Response(b'{"encrypted_data":"x"}', media_type="application/json")
