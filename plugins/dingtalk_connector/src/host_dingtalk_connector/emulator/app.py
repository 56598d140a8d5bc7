"""The Starlette application: every HTTP and WebSocket route of the emulator on one port."""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute

from .callbacks import callback_routes
from .control import ControlApi

if TYPE_CHECKING:
    from .server import Emulator

__all__ = ["build_app"]


def build_app(emu: Emulator) -> Starlette:
    api, cards = emu.openapi, emu.cards
    page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")

    async def chat_page(request: Request) -> Response:
        return HTMLResponse(page)

    routes: list[BaseRoute] = [
        Route("/", chat_page, methods=["GET"]),
        Route("/v1.0/gateway/connections/open", emu.gateway.open_connection, methods=["POST"]),
        WebSocketRoute("/connect", emu.gateway.websocket_endpoint),
        api.route("POST", "/robot/sendBySession", emu.webhook.send_by_session, auth="none",
                  json_body=False),
        *api.routes(),
        api.route("POST", "/v1.0/card/instances", cards.create_instance),
        api.route("PUT", "/v1.0/card/instances", cards.update_instance),
        api.route("POST", "/v1.0/card/instances/deliver", cards.deliver),
        api.route("POST", "/v1.0/card/instances/createAndDeliver", cards.create_and_deliver),
        api.route("PUT", "/v1.0/card/streaming", cards.streaming),
        api.route("POST", "/v1.0/card/callbacks/register", cards.register_callback),
        api.route("POST", "/v1.0/im/v1.0/robot/interactiveCards/send", cards.legacy_send),
        api.route("PUT", "/v1.0/im/robots/interactiveCards", cards.legacy_update),
        *callback_routes(emu),  # webhook mode: signed callbacks POSTed to a bot (callbacks.py)
        *ControlApi(emu).routes(),  # ends with a catch-all for unknown /_emulator/ paths
        api.fallback_route(),
    ]
    return Starlette(routes=routes)
