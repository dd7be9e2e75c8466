"""What a run is: its settings (`RunConfig`), the paper's methods, and the values each setting allows."""
