"""The HTTP gateway and the browser playground (`diffuserve gateway`, `diffuserve serve --http-port`; the `gateway`
extra): JSON and server-sent events in front of the gRPC service, as its client. An adapter, never a second
pipeline: the gateway checks the JSON's shape and types, the gRPC server does the real validation.

`payload` (JSON in and out) needs nothing beyond the server's own dependencies; `app` needs starlette and uvicorn.
"""

# Seconds open streams get to finish when the gateway stops (SIGTERM, or the server it belongs to drains).
GATEWAY_GRACE_S = 30.0
