"""The client library serving engines embed: `Client` (sync) and `AsyncClient`."""

from kvstore.client.aio import AsyncClient
from kvstore.client.client import Client
from kvstore.results import PutResult

__all__ = ["AsyncClient", "Client", "PutResult"]
