"""URIs and object storage (retries, atomic publish, secrets), logging set-up."""
