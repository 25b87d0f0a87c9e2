"""Opening one connection: the DSN and its target, TLS, the driver call and its failures."""
