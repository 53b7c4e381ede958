"""Compatibility: the graph passes moved to conversion/ (finding streams, building the plan) and
compile/ (the backend's passes). What pickles and older code name here is re-exported."""
