"""Implementation of the client library; import the public names from ``bs_coordination.client``
(or ``bs_coordination``)."""
