"""Radiotherapy objects built from masks on the pseudonymised CT: planar contours, the RT Structure Set, its
Segmentation twin and the QA picture. Like :mod:`gateway.inference`, never sees identity or keys.
"""
