"""Reading model files and running them; needs no torch."""
