"""The broker and endpoint processes the integration tests drive (their fixtures are in conftest)."""

from __future__ import annotations

from harness.deploy import BrokerProcess, EndpointProcess

Broker = BrokerProcess


class Endpoint(EndpointProcess):
    def start(self, client: object, timeout: float = 30) -> str:
        """Start the endpoint; its id once ``client`` sees it online."""
        self.spawn()
        return self.wait_online(client, timeout)
