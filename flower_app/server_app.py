"""The ServerApp component: fl-lightning's server (fl_lightning.flower.server)."""

from pathlib import Path

from fl_lightning.flower.server import make_server_app

app = make_server_app(Path(__file__).parent)
