"""stream-reco: fresh music recommendations from a live stream of plays."""

__version__ = "0.1.0"
