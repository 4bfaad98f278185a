"""The HTTP liveness service (``ptanet serve``): FastAPI app, limits and the web page. Needs the
``[serve]`` extra (FastAPI, uvicorn, python-multipart)."""
