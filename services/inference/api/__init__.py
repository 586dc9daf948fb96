"""The inference API process: checks, stores and queues generation jobs; never loads the model."""
