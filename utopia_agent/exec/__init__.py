"""Commands run in claims' containers: once with bounded output, or as an interactive session over Kubernetes' channel protocol."""
