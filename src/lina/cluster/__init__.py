"""lina.cluster"""
