"""Rendering reports and artifacts."""
