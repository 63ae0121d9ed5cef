"""The stage graph over a content-addressed stage store, fleet manifests."""
