"""The wire contract (kvstore.proto), its generated modules, and data-frame codecs."""
