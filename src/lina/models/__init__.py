"""lina.models"""
