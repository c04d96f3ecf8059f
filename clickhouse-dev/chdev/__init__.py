"""chserver internals: SQL routing, body streams, compression, errors, engine pool, HTTP handler."""
