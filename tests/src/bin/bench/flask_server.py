"""The production path skyferry replaces, for skyferry-bench: a small Flask app that
serves one directory tree over HTTP, for wget on the far side to pull a file when it is
told the file is ready. Flask's own (werkzeug) server, threaded, as a small deployment
runs it.

usage: flask_server.py ROOT PORT
GET /<relative path> answers the file's bytes; GET /-/ready answers "ok".
"""

import logging
import sys

from flask import Flask, send_from_directory


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    root, port = sys.argv[1], int(sys.argv[2])
    app = Flask(__name__)
    # One log line per request would cost the server CPU the bench charges to it.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    @app.route("/-/ready")
    def ready() -> str:
        return "ok"

    @app.route("/<path:rel>")
    def serve(rel: str):
        # send_from_directory refuses paths that leave `root`.
        return send_from_directory(root, rel)

    app.run(host="127.0.0.1", port=port, threaded=True)


if __name__ == "__main__":
    main()
