"""The anchor of the service benchmark: a trivial FastAPI JSON endpoint (POST and GET)."""

from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()


class Body(BaseModel):
    device_name: str
    user_id: str


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}


@app.post("/echo")
async def echo(body: Body) -> dict[str, str]:
    return {"device_name": body.device_name, "user_id": body.user_id}
