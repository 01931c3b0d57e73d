"""Entry point: ``python3 -m llmpods_server``."""

from llmpods_server.server import main

if __name__ == "__main__":
    main()
