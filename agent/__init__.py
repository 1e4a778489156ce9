"""Everything that talks to models; knows nothing about the apps."""
