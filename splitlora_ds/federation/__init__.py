"""How client adapters are combined across clients (see ../shared/DESIGN.md: aggregation
strategies live here as they are rebuilt; `secure` masks each client's contribution)."""
