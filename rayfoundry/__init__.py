"""Shared foundations of rayfoundry: errors and their exit codes, storage paths and URIs, the Ray
environment. Nothing here imports Ray at import time."""
