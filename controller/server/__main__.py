"""`python -m controller.server`: run the API server (same as `controller serve`)."""

from __future__ import annotations

import argparse
import os
import sys

from controller.connect import default_api_url


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run `serve()` until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m controller.server", description="Run the Conveyor HTTP API server."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8008, help="port to listen on")
    parser.add_argument(
        "--db",
        default=None,
        help="store URL: sqlite:///path or postgresql://... (default: the embedded SQLite store)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("CONVEYOR_API_TOKEN") or None,
        help="API token clients must send (default: $CONVEYOR_API_TOKEN; none: open)",
    )
    parser.add_argument(
        "--files-dir",
        default=os.environ.get("CONVEYOR_FILES_DIR") or None,
        help="folder of the files endpoint (artifacts, models); default: "
        "$CONVEYOR_FILES_DIR, else $CONVEYOR_HOME/files",
    )
    parser.add_argument(
        "--public-url",
        default=os.environ.get("CONVEYOR_PUBLIC_URL") or None,
        help="address people and code outside Conveyor reach the server by "
        "(default: $CONVEYOR_PUBLIC_URL, else the address a client used)",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug"],
    )
    args = parser.parse_args(argv)
    db = args.db or default_api_url()
    if db.startswith(("http://", "https://")):
        parser.error(f"--db must name a database, not an API URL: {db}")
    from controller.server.app import serve

    serve(
        args.host,
        args.port,
        db,
        args.token,
        log_level=args.log_level,
        files_dir=args.files_dir,
        public_url=args.public_url,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
