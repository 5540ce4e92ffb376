"""lina.data"""
