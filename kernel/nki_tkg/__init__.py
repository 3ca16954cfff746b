"""Our NKI `attention_tkg` kernel for Trainium (NKI 0.3+ API)."""
