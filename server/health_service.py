"""The gRPC health service, with Watch streams that end when the server starts draining.

grpc's own asyncio servicer keeps every `Watch` stream open until the server stops; during a
graceful shutdown the server waits for them like for any call in flight, so a single watching
client (a load balancer, a service mesh) would hold the drain for the whole grace period. Here
a watcher gets NOT_SERVING, then its stream ends (status OK): the drain waits only for real work.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from grpc_health.v1 import health, health_pb2

SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class DrainingHealthServicer(health.aio.HealthServicer):
    """`grpc_health`'s asyncio HealthServicer; after `enter_graceful_shutdown()` (every status
    NOT_SERVING from then on) each Watch stream sends that status and finishes."""

    def __init__(self) -> None:
        super().__init__()
        self._gracefully_shutting_down: bool = False
        self._changed = asyncio.Condition()

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        # An async generator, not context.write(): the interceptors wrap streams as generators.
        last = None
        while True:
            async with self._changed:  # released while writing: a slow watcher blocks no set()
                status = self._server_status.get(request.service, SERVICE_UNKNOWN)
                while status == last and not self._gracefully_shutting_down:
                    await self._changed.wait()
                    status = self._server_status.get(request.service, SERVICE_UNKNOWN)
                draining = self._gracefully_shutting_down
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if draining:
                return

    async def _set(
        self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus
    ) -> None:
        async with self._changed:
            self._server_status[service] = status
            self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        """Every status NOT_SERVING for good (later `set` calls are ignored), in one step."""
        async with self._changed:
            if self._gracefully_shutting_down:
                return
            self._gracefully_shutting_down = True
            for service in self._server_status:
                self._server_status[service] = health_pb2.HealthCheckResponse.NOT_SERVING
            self._changed.notify_all()


__all__ = ["DrainingHealthServicer"]
