"""Stop an endpoint from the SDK."""

import os

from globus_compute_sdk import Client

ep_id = os.environ["ENDPOINT_ID"]
gcc = Client()
print("before:", gcc.get_endpoint_status(ep_id)["status"])
print("stopping:", gcc.stop_endpoint(ep_id)["stopping"])
