"""The encoder, the LanceDB store (build, stats, hybrid search), bucket assignment and answering."""
