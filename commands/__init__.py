"""The command-line commands, one module per stage; ``memshare.cli`` registers them."""
