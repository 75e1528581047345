"""Ray Serve applications; `serve_deployments.app:build_app` is the entry point (no I/O at import)."""
