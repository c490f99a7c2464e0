"""The stages every embedding pipeline shares: prepare -> embed (cached, see vitlab.cache),
then the PlantCLEF fit -> predict -> score (the data flow: README, "How it works")."""
