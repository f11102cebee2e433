# gunicorn settings of the Python stack the benchmark compares against (the seed article's:
# preload, 3 uvicorn workers, max_requests 50, timeout 60). The harness overrides the worker
# count, max_requests and the bind address through the environment.
import os

preload_app = True
worker_class = "uvicorn.workers.UvicornWorker"
workers = int(os.environ.get("WORKERS", "3"))
max_requests = int(os.environ.get("MAX_REQUESTS", "50"))
timeout = 60
bind = os.environ.get("BIND", "127.0.0.1:8100")
loglevel = "warning"
