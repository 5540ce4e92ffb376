"""lina.placement"""
