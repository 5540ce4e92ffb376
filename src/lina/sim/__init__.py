"""lina.sim"""
