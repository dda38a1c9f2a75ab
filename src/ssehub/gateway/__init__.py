"""The OpenAI-compatible gateway: the demo model, the relay to an upstream, and completion
streams that survive disconnects (each is a broker log `run:<completion id>`)."""

from ssehub.gateway.demo import DEMO_MODEL
from ssehub.gateway.routes import Gateway, gateway_routes

__all__ = ["DEMO_MODEL", "Gateway", "gateway_routes"]
