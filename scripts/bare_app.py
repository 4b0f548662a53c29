"""The benchmark's baseline: a bare FastAPI endpoint that only validates the same JSON body."""

from fastapi import FastAPI
from starlette.responses import Response

from citadel.api import DecryptRequest, EncryptRequest

app = FastAPI()


@app.post("/encrypt")
async def encrypt(body: EncryptRequest) -> Response:
    return Response(b'{"encrypted_data":"x"}', media_type="application/json")


@app.post("/decrypt")
async def decrypt(body: DecryptRequest) -> Response:
    return Response(b'{"plaintext":"x"}', media_type="application/json")
