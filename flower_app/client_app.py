"""The ClientApp component: fl-lightning's local training (fl_lightning.flower.client)."""

from fl_lightning.flower.client import make_client_app

app = make_client_app()
