"""lina.comm"""
