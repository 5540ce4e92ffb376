"""lina.moe"""
