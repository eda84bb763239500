"""Everything a finished dataset is made of, in publication order (``release``): run-prefixed
shards (``writer``), pictures (``plots``), the cost table (``cost``), the data card (``card``),
the manifest last; then, optionally, one commit to the Hugging Face Hub (``hub``)."""
