"""The I/O engine: where expert bytes come from and how they are read (reader, staging, stores),
and where bundles come from (a folder, or the Hub)."""
