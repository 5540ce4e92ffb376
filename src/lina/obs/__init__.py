"""lina.obs"""
